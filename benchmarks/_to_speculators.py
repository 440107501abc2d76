"""Write speculators 0.9.0's offline layout from our shards; run with the *baseline's* interpreter.

    python _to_speculators.py OUR_SHARD_DIR SPEC_DIR [EXTRA_ROWS]

The layout (speculators `train/data.py::ArrowDataset`, `hs_connectors.FileTransfer`): a `datasets.save_to_disk` folder
with columns `input_ids`, `loss_mask`, `seq_len` (torch format), plus `hidden_states/hs_{i}.safetensors` holding
`hidden_states [T, 4, H]` (3 aux + last pre-norm) and `token_ids [T]`. `d2t-{Vd}.npy`/`t2d-{Vd}.npy` and
`token_freq.pt` are copied next to it. `EXTRA_ROWS` copies of the last sample are appended so that speculators'
mandatory validation split (the last rows) does not take training samples away; pass
`--train-data-ratio (N + 0.5) / (N + EXTRA_ROWS)`.

The conversion is checked with speculators' own dataset class: every sample read back equals the shard's.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file


def read_shards(our_dir: Path):
    index = json.loads((our_dir / "index.json").read_text())
    for entry in index["shards"]:
        with safe_open(str(our_dir / entry["file"]), "pt") as f:
            if "hidden_states_scale" in f.keys():
                raise SystemExit(
                    f"{our_dir}: fp8 shards (--storage-dtype fp8_e4m3); convert bfloat16 or float32 ones."
                )
            offsets = f.get_tensor("sample_offsets")
            ids, mask, hs = f.get_tensor("input_ids"), f.get_tensor("loss_mask"), f.get_tensor("hidden_states")
        for s in range(len(offsets) - 1):
            a, b = int(offsets[s]), int(offsets[s + 1])
            yield ids[a:b].long(), mask[a:b].long(), hs[a:b]


def main() -> None:
    from datasets import Dataset

    our_dir, spec_dir = Path(sys.argv[1]), Path(sys.argv[2])
    extra = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    if spec_dir.exists():
        shutil.rmtree(spec_dir)
    (spec_dir / "hidden_states").mkdir(parents=True)
    rows = {"input_ids": [], "loss_mask": [], "seq_len": []}
    samples = list(read_shards(our_dir))
    samples += [samples[-1]] * extra
    for i, (ids, mask, hs) in enumerate(samples):
        rows["input_ids"].append(ids.tolist())
        rows["loss_mask"].append(mask.tolist())
        rows["seq_len"].append(len(ids))
        save_file(
            {"hidden_states": hs.contiguous(), "token_ids": ids.contiguous()},
            str(spec_dir / "hidden_states" / f"hs_{i}.safetensors"),
        )
    ds = Dataset.from_dict(rows)
    ds.set_format(type="torch")
    ds.save_to_disk(str(spec_dir))

    d2t = np.load(our_dir / "d2t.npy")
    shutil.copy(our_dir / "d2t.npy", spec_dir / f"d2t-{len(d2t)}.npy")
    shutil.copy(our_dir / "t2d.npy", spec_dir / f"t2d-{len(d2t)}.npy")
    if (our_dir / "token_freq.pt").exists():
        shutil.copy(our_dir / "token_freq.pt", spec_dir / "token_freq.pt")

    # Read everything back through speculators' own dataset class and compare.
    from speculators.train.data import ArrowDataset

    n = len(samples)
    check = ArrowDataset(max_len=10**9, datapath=str(spec_dir), on_missing="raise", train_ratio=1.0, split="train")
    assert len(check) == n, (len(check), n)
    for i, (ids, mask, hs) in enumerate(samples):
        item = check[i]
        assert torch.equal(item["input_ids"], ids), i
        assert torch.equal(item["loss_mask"].long(), mask), i
        assert torch.equal(item["hidden_states"], hs[:, :-1].flatten(1)), i
        assert torch.equal(item["verifier_last_hidden_states"], hs[:, -1]), i
    print(json.dumps({"rows": n, "training_rows": n - extra, "draft_vocab_size": int(len(d2t)), "verified": True}))


if __name__ == "__main__":
    main()
