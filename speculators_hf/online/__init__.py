"""Online and hybrid training: the verifier runs in vLLM servers and the trainer streams its hidden states.

common.py      what the three below share: the spool folders a trainer trusts, server.json, errors
server.py      `speculators-hf serve-hidden-states`: vLLM's OpenAI server in hidden-state extraction mode
transport.py   how one request's states travel from the server's connector to the trainer (a file spool)
client.py      one prompt per request, round-robin over servers, retries, checks (token ids, shape, NaN/inf);
               HTTP through `speculators_hf.http` (deadlines, retry policy, API key)
dataset.py     tokens-only datagen samples + states fetched per batch (online) or cached once (hybrid)
"""

from .client import HiddenStatesClient, ProducerUnavailable
from .server import HiddenStatesServer, ServeArguments
from .transport import HiddenStatesTransport, SpoolTransport

__all__ = [
    "HiddenStatesClient",
    "HiddenStatesServer",
    "HiddenStatesTransport",
    "ProducerUnavailable",
    "ServeArguments",
    "SpoolTransport",
]
