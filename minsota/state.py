"""The state that flows between blocks: a `TensorDict` with batch_size [B, T].

Keys (fixed for a run, so `torch.compile` guards never see a new key set):
  hidden        (B, T, D)  the residual stream; the only key a block writes
  positions     (B, T)     int64 position of each token within its document (or window)
  document_ids  (B, T)     int64, present only for `data.packing = "document"`: attention stays inside a document

Norms, attentions and feed-forwards never see the TensorDict: they are plain tensor -> tensor modules,
comparable one-to-one with `minsota.reference`.
"""

import torch
from tensordict import TensorDict

HIDDEN = "hidden"
POSITIONS = "positions"
DOCUMENT_IDS = "document_ids"


def make_state(hidden: torch.Tensor, positions: torch.Tensor, document_ids: torch.Tensor | None = None) -> TensorDict:
    entries = {HIDDEN: hidden, POSITIONS: positions}
    if document_ids is not None:
        entries[DOCUMENT_IDS] = document_ids
    return TensorDict(entries, batch_size=hidden.shape[:2])


def read(state: TensorDict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(hidden, positions, document_ids or None): what every block reads, once."""
    return state[HIDDEN], state[POSITIONS], state.get(DOCUMENT_IDS, None)
