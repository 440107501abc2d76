from speculators_hf.pipeline import main

raise SystemExit(main())
