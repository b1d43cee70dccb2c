"""The state that flows between blocks: a `TensorDict` with batch_size [B, T].

Keys the decoder puts in (fixed for a run, so `torch.compile` guards never see a new key set):
  hidden        (B, T, D)  the residual stream; every block writes it
  embeddings    (B, T, D)  the input of the first block (token embeddings, scaled and position-embedded): what
                           x0 / U-Net skips mix back in (modded-nanogpt); blocks read it, never write it
  positions     (B, T)     int64 position of each token within its document (or window)
  document_ids  (B, T)     int64, present only for `data.packing = "document"`: attention stays inside a document

A block may write further keys of batch size (B, T) (e.g. its attention's values for ResFormer's value
residual); every later block sees them, in the same forward only. The key set must be the same every step:
a block that writes a key writes it on every call (a new key set recompiles the compiled model), and a key
is read only by blocks after the one that writes it. Scalars (auxiliary losses) cannot live here, since
every entry has the batch dimensions [B, T]: see "Auxiliary losses" in `minsota.hookspecs`.

Norms, attentions and feed-forwards never see the TensorDict: they are plain tensor -> tensor modules,
comparable one-to-one with `minsota.reference`.
"""

import torch
from tensordict import TensorDict

HIDDEN = "hidden"
EMBEDDINGS = "embeddings"
POSITIONS = "positions"
DOCUMENT_IDS = "document_ids"


def make_state(hidden: torch.Tensor, positions: torch.Tensor, document_ids: torch.Tensor | None = None) -> TensorDict:
    """The first block's state: ``hidden`` and ``embeddings`` both its input."""
    entries = {HIDDEN: hidden, EMBEDDINGS: hidden, POSITIONS: positions}
    if document_ids is not None:
        entries[DOCUMENT_IDS] = document_ids
    return TensorDict(entries, batch_size=hidden.shape[:2])


def read(state: TensorDict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(hidden, positions, document_ids or None): what every block reads, once."""
    return state[HIDDEN], state[POSITIONS], state.get(DOCUMENT_IDS, None)
