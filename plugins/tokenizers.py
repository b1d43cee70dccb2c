"""Built-in tokenizers: `bytes` (UTF-8 bytes, needs nothing), `gpt-neox-20b` and `hf` (any Hugging Face tokenizer).

`data.tokenizer` names one of them; `hf:NAME` or any path / hub name with a slash reaches `hf` (see
`minsota.data.build_tokenizer`). Hugging Face tokenizers load through `transformers.AutoTokenizer` from a hub
name, a local directory, or a bare ``tokenizer.json``. With the hub unreachable a hub name is looked up in the
local cache only, and failing that refused in one line, at once, instead of after the libraries' ~47 s of
retries (measured with the hub unreachable: ~47 s for a tokenizer, ~24 s for streaming C4).
"""

from pathlib import Path

from minsota import hookimpl
from minsota.data import hub_reachable, no_argument
from minsota.errors import UserError

# A bare tokenizer.json has no config naming its end-of-text token; these are the usual spellings.
EOS_SPELLINGS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); byte 0 (NUL, absent from text) doubles as end-of-document"""

    name = "bytes"
    vocab_size = 256
    eos_id = 0

    def __init__(self, arg: str = "", data_cfg=None):
        no_argument("bytes", arg)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")


def _load_transformers_tokenizer(spec: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(spec).expanduser()
    if path.exists():
        try:
            if path.is_file():
                return PreTrainedTokenizerFast(tokenizer_file=str(path))
            return AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # the libraries raise anything (even bare Exception) for a file they cannot read
            cause = " ".join(line.strip() for line in str(e).strip().splitlines()[:2]) or type(e).__name__
            raise UserError(
                f"'{spec}' is not a tokenizer (give a tokenizer.json file or a directory holding a "
                f"Hugging Face tokenizer): {cause}"
            ) from None
    if path.is_absolute() or spec.startswith(("~", "./", "../")) or spec.endswith(".json"):  # a path, not a hub name
        raise UserError(f"'{spec}': no such file or directory")
    online = hub_reachable()
    try:
        return AutoTokenizer.from_pretrained(spec, local_files_only=not online)  # offline: the cache may hold it
    except (OSError, ValueError) as e:
        if online:
            raise UserError(f"cannot load tokenizer '{spec}': {str(e).strip().splitlines()[0]}") from None
        raise UserError(
            f"the Hugging Face hub is unreachable (or HF_HUB_OFFLINE is set) and '{spec}' is not in the "
            f"local cache: point data.tokenizer at a local copy, a directory holding tokenizer.json "
            f"(e.g. --set data.tokenizer=PATH/gpt-neox-20b) or the tokenizer.json file itself"
        ) from None


class HFTokenizer:
    """Any Hugging Face tokenizer: hf:NAME, a hub name, a local directory or a tokenizer.json"""

    def __init__(self, spec: str, data_cfg=None):
        if not spec:
            raise UserError("hf: needs a tokenizer, e.g. hf:EleutherAI/pythia-160m or a local directory")
        tokenizer = _load_transformers_tokenizer(spec)
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            eos_id = next(
                (tokenizer.convert_tokens_to_ids(t) for t in EOS_SPELLINGS if t in tokenizer.get_vocab()), None
            )
        if eos_id is None:
            raise UserError(
                f"tokenizer '{spec}' has no end-of-text token to separate documents "
                f"(give the directory with its tokenizer_config.json, which names eos_token)"
            )
        self.name, self.vocab_size, self.eos_id = spec, len(tokenizer), eos_id  # len() counts added tokens
        self._tokenizer = tokenizer
        self._split_special_tokens()

    def _split_special_tokens(self):
        # Corpus text that spells "<|endoftext|>" is text, not a document boundary the data never had.
        self._tokenizer.backend_tokenizer.encode_special_tokens = True

    def __setstate__(self, state):  # DataLoader workers started by spawn: the Rust-side flag is not pickled
        self.__dict__.update(state)
        self._split_special_tokens()

    def encode(self, text: str) -> list[int]:
        # The Rust tokenizer directly: no special tokens added, no "sequence longer than the model" warnings.
        return self._tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    def save_pretrained(self, directory) -> None:
        """tokenizer.json and tokenizer_config.json, naming the end-of-text token even when it was found by
        spelling (a bare tokenizer.json names none)."""
        if self._tokenizer.eos_token is None:
            self._tokenizer.eos_token = self._tokenizer.convert_ids_to_tokens(self.eos_id)
        self._tokenizer.save_pretrained(str(directory))


def gpt_neox_20b(arg: str = "", data_cfg=None) -> HFTokenizer:
    """EleutherAI's GPT-NeoX-20B BPE (50,277 tokens; Pythia's) from the hub; offline, name its directory instead"""
    no_argument("gpt-neox-20b", arg)
    return HFTokenizer("EleutherAI/gpt-neox-20b", data_cfg)


@hookimpl
def minsota_register_tokenizers():
    return {"bytes": ByteTokenizer, "gpt-neox-20b": gpt_neox_20b, "hf": HFTokenizer}
