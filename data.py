"""The data: edit make_datasets to train on your own. Its settings (DataConfig) are flags like any other.

Three datasets, nothing downloaded:
- digits (default): the 1,797 handwritten 8x8 digits that ship inside scikit-learn; a sample is (image, label).
- shakespeare_char: Tiny Shakespeare (shipped in assets/), one token per character; a sample is a window of
  block_size characters and the same window shifted by one as targets. Training windows start anywhere in the
  first 90%, as in nanoGPT; the last 10% is split in half (validation, test), each cut into consecutive windows
  that score every character exactly once. With --streaming true the training split is instead streamed from litdata
  chunks (written once, or read from an object store: streaming_dir), as windows of block_size + 1 consecutive
  characters that do not overlap, shuffled by litdata; validation and test are the same.
- shakespeare_speeches: the same text cut at its blank lines into speeches (about 7,200), tokenized by the Hugging
  Face model's own tokenizer (model.hf_path); a sample is one speech between two end-of-text tokens, padded to
  block_size + 1 tokens (a longer one is cut into several). Speeches starting in the first 90% train, the rest split
  in half as above; every token of a split is scored exactly once. Samples differ in length: the loss of a step
  weighs each scored token once (train.py's loss_weight).
"""

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

DIGIT_CLASSES = 10
SHAKESPEARE = Path(__file__).parent / "assets" / "tinyshakespeare.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
IGNORE_INDEX = -100  # a target that is not scored (the padded end of the last window of a split)


@dataclass
class DataConfig:
    """The data's settings (data.py); in a YAML file under `data:`."""

    dataset: Literal["digits", "shakespeare_char", "shakespeare_speeches"] = "digits"
    """Dataset: digits (8x8 images, 10 classes), shakespeare_char (characters of Tiny Shakespeare) or
    shakespeare_speeches (its speeches in the tokens of the Hugging Face model's tokenizer: --hf_path)."""
    streaming: bool = False
    """shakespeare_char: stream the training split from litdata chunks (litdata.StreamingDataset), as a corpus larger
    than the disk would be; its position in the epoch is saved with each checkpoint."""
    streaming_dir: str | None = None
    """Where the chunks are: a local folder (written there once if it holds none) or an object-store URL (s3://...,
    the chunks copied there beforehand). None: a folder beside the text in assets/."""


class DataError(Exception):
    """Data that cannot be used as configured: reported as one line."""


def make_datasets(cfg) -> tuple[Dataset, Dataset, Dataset]:
    """(train, val, test) for cfg.data.dataset; the splits do not depend on cfg.seed."""
    if cfg.data.streaming and cfg.data.dataset != "shakespeare_char":
        raise DataError(f"streaming=True is invalid with dataset={cfg.data.dataset!r}: only shakespeare_char streams")
    if cfg.data.dataset == "shakespeare_char":
        train, val, test = char_datasets(SHAKESPEARE, cfg.model.block_size)
        if cfg.data.streaming:  # the same training split, streamed from chunks
            chunks = cfg.data.streaming_dir or str(SHAKESPEARE.with_name(f"{SHAKESPEARE.stem}-"
                                                                         f"{SHAKESPEARE_SHA256[:12]}-train-chunks"))
            train = streamed_windows(Path(train.tokens.filename), train.end, chunks, cfg.model.block_size,
                                     cfg.seed)
        return train, val, test
    if cfg.data.dataset == "shakespeare_speeches":
        return speech_datasets(_read_text(SHAKESPEARE), hf_tokenizer(cfg.model.hf_path), cfg.model.block_size)
    digits = _load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    splits = order[:1257], order[1257:1527], order[1527:]  # 1,257 / 270 / 270 images
    return tuple(TensorDataset(images[idx], labels[idx]) for idx in splits)


def tokens_per_sample(cfg) -> int | None:
    """How many tokens one sample holds, for the tokens_per_sec the loop logs; None where samples are no token
    sequences."""
    return cfg.model.block_size if cfg.data.dataset != "digits" else None


def num_classes(cfg) -> int:
    """What the model predicts among: 10 digits, or the characters of the text (the Hugging Face model brings its
    own vocabulary)."""
    return len(vocabulary(cfg)) if cfg.data.dataset == "shakespeare_char" else DIGIT_CLASSES


def vocabulary(cfg) -> str | None:
    """The characters of a text dataset in token order (token i is vocabulary[i]); None for digits."""
    return "".join(sorted(set(_read_text(SHAKESPEARE)))) if cfg.data.dataset == "shakespeare_char" else None


def text_codec(cfg) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]] | None:
    """(encode, decode) between text and the tokens of a text dataset (sample.py); None for digits. encode raises
    DataError on text the vocabulary cannot write."""
    if cfg.data.dataset == "shakespeare_speeches":
        tokenizer = hf_tokenizer(cfg.model.hf_path)
        return (lambda text: tokenizer(text)["input_ids"]), tokenizer.decode
    chars = vocabulary(cfg)
    if chars is None:
        return None

    def encode(text: str) -> list[int]:
        if unknown := sorted(set(text) - set(chars)):
            raise DataError(f"{unknown[0]!r} is not in the run's vocabulary")
        return [chars.index(char) for char in text]

    return encode, lambda tokens: "".join(chars[i] for i in tokens)


@cache
def hf_tokenizer(path_or_name: str):
    """The Hugging Face model's own tokenizer (AutoTokenizer), from its folder or hub name."""
    from transformers import AutoTokenizer  # imported only for this dataset: it is slow

    try:
        return AutoTokenizer.from_pretrained(path_or_name)
    except OSError as err:
        raise DataError(f"hf_path={path_or_name!r}: no tokenizer there ({str(err).splitlines()[0]})") from None


def _load_digits():
    from sklearn.datasets import load_digits  # imported only for digits: it is slow

    return load_digits()


def _read_text(path: Path) -> str:
    """The shipped text, checked against its known sha256, so that a damaged copy cannot train silently."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path} cannot be read ({err.strerror})") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise DataError(f"{path} has sha256 {digest[:12]}..., expected {SHAKESPEARE_SHA256[:12]}...: the file is "
                        f"damaged or not Tiny Shakespeare (restore it with git checkout)")
    return raw.decode("utf-8")


def _tokens(path: Path) -> np.memmap:
    """The text as uint16 tokens in a file beside it, encoded once and read through np.memmap, so that a corpus
    larger than memory works the same way. Written to a temporary file and renamed: never read half-written."""
    text = _read_text(path)
    token_file = path.with_name(f"{path.stem}-{SHAKESPEARE_SHA256[:12]}.uint16")
    if not token_file.is_file() or token_file.stat().st_size != 2 * len(text):
        chars = sorted(set(text))
        lookup = {char: i for i, char in enumerate(chars)}
        tokens = np.array([lookup[char] for char in text], dtype=np.uint16)
        tmp = token_file.with_name(f".{token_file.name}.{os.getpid()}.tmp")
        tokens.tofile(tmp)
        os.replace(tmp, token_file)
    return np.memmap(token_file, dtype=np.uint16, mode="r")


def char_datasets(path: Path, block_size: int) -> tuple[Dataset, Dataset, Dataset]:
    tokens = _tokens(path)
    train_end = int(0.9 * len(tokens))  # nanoGPT's split: the first 90% trains
    val_end = train_end + (len(tokens) - train_end) // 2
    if block_size >= train_end:
        raise DataError(f"block_size={block_size} is invalid: expected fewer than the {train_end} characters of "
                        f"the training split")
    return RandomWindows(tokens, train_end, block_size), \
        ScoredWindows(tokens, train_end, val_end, block_size), ScoredWindows(tokens, val_end, len(tokens), block_size)


class RandomWindows(Dataset):
    """Window i: tokens[i : i + block_size] and their next tokens, for every start that stays before `end`."""

    def __init__(self, tokens: np.ndarray, end: int, block_size: int):
        self.tokens, self.end, self.block_size = tokens, end, block_size

    def __len__(self) -> int:
        return self.end - self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.from_numpy(self.tokens[i : i + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A whole batch in one read of the token file (the DataLoader calls this instead of one call per window)."""
        starts = np.asarray(indices, dtype=np.int64)[:, None]
        chunks = torch.from_numpy(self.tokens[starts + np.arange(self.block_size + 1)].astype(np.int64))
        return list(zip(chunks[:, :-1], chunks[:, 1:], strict=True))


def streamed_windows(token_file: Path, end: int, chunks: str, block_size: int, seed: int):
    """litdata's StreamingDataset of the first `end` tokens of token_file in chunks at `chunks` (written there first
    if it is a local folder that holds none): a sample is a window of block_size + 1 consecutive tokens as (inputs,
    targets), windows do not overlap, and litdata shuffles them by seed and epoch."""
    from litdata import StreamingDataset, TokensLoader  # imported only for streaming

    if "://" not in chunks and not (Path(chunks) / "index.json").is_file():
        write_chunks(token_file, end, Path(chunks))
    return StreamingDataset(chunks, item_loader=TokensLoader(block_size=block_size + 1), shuffle=True, seed=seed,
                            transform=_inputs_and_targets)


def write_chunks(token_file: Path, end: int, output_dir: Path) -> None:
    """The first `end` tokens of token_file (uint16) as litdata chunks in output_dir (copy them to an object store
    for streaming_dir=s3://...). litdata.optimize writes them in a process of its own, because it answers Ctrl-C
    with exit status 0, which must not pass for a finished run; under a temporary name, renamed once complete."""
    tmp = output_dir.with_name(f".{output_dir.name}.{os.getpid()}.tmp")
    code = "import sys, data; data._optimize_tokens(sys.argv[1], int(sys.argv[2]), sys.argv[3])"
    try:
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited: no traceback before optimize starts
        try:
            writer = subprocess.Popen([sys.executable, "-c", code, str(token_file), str(end), str(tmp)],
                                      cwd=Path(__file__).parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)
        finally:
            signal.signal(signal.SIGINT, interrupt)
        raised = [line for line in writer.communicate()[1].splitlines() if re.match(r"\w+(Error|Interrupt)\b", line)]
        if not (tmp / "index.json").is_file():
            raise DataError(f"streaming_dir={str(output_dir)!r}: writing the chunks stopped before they were complete "
                            f"(exit status {writer.returncode}{', ' + raised[-1] if raised else ''})")
        try:
            os.replace(tmp, output_dir)
        except OSError as err:
            if not (output_dir / "index.json").is_file():  # else another node wrote them first
                raise DataError(f"streaming_dir={str(output_dir)!r}: cannot put the chunks there ({err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _optimize_tokens(token_file: Path, end: int, output_dir: Path, tokens_per_input: int = 1 << 14) -> None:
    from litdata import TokensLoader, optimize

    tokens = np.memmap(token_file, dtype=np.uint16, mode="r")[:end]
    # small chunks for a small text (21 here), so that ranks and workers share them evenly; a corpus: 64MB
    optimize(fn=partial(_token_slice, tokens, tokens_per_input), output_dir=str(output_dir), chunk_bytes="256KB",
             inputs=list(range(0, end, tokens_per_input)), item_loader=TokensLoader(), num_workers=1, verbose=False)


def _token_slice(tokens: np.ndarray, length: int, start: int) -> torch.Tensor:
    return torch.from_numpy(tokens[start : start + length].astype(np.int32))


def _inputs_and_targets(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    window = window.long()
    return window[:-1], window[1:]


class ScoredWindows(Dataset):
    """Consecutive windows whose targets are the characters start .. end - 1, each exactly once. A window's inputs
    are the characters before its targets (the first one may lie in the split before). The last window is padded:
    padded targets are IGNORE_INDEX, and causal attention keeps the padding from the scored positions."""

    def __init__(self, tokens: np.ndarray, start: int, end: int, block_size: int):
        self.tokens, self.start, self.end, self.block_size = tokens, start, end, block_size

    def __len__(self) -> int:
        return -(-(self.end - self.start) // self.block_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.start + i * self.block_size  # first target
        length = min(self.block_size, self.end - first)
        inputs = torch.zeros(self.block_size, dtype=torch.int64)
        targets = torch.full((self.block_size,), IGNORE_INDEX, dtype=torch.int64)
        inputs[:length] = torch.from_numpy(self.tokens[first - 1 : first - 1 + length].astype(np.int64))
        targets[:length] = torch.from_numpy(self.tokens[first : first + length].astype(np.int64))
        return inputs, targets


def speech_datasets(text: str, tokenizer, block_size: int) -> tuple[Dataset, Dataset, Dataset]:
    """The speeches (blank-line separated) of `text`, tokenized, in three splits by where each speech starts."""
    end = tokenizer.eos_token_id
    if end is None:
        raise DataError(f"the tokenizer of {tokenizer.name_or_path!r} has no end-of-text token to mark speeches with")
    speeches = text.split("\n\n")
    starts = np.cumsum([0] + [len(speech) + 2 for speech in speeches[:-1]])
    train_end = int(0.9 * len(text))
    val_end = train_end + (len(text) - train_end) // 2
    tokens = [[end, *ids, end] for ids in tokenizer(speeches)["input_ids"]]
    splits = [[ids for ids, start in zip(tokens, starts, strict=True) if low <= start < high]
              for low, high in ((0, train_end), (train_end, val_end), (val_end, len(text)))]
    return tuple(PaddedSequences(split, block_size, pad=end) for split in splits)


class PaddedSequences(Dataset):
    """Token sequences as (inputs, targets) of block_size tokens: the sequence and the same shifted by one, padded at
    the end (padded targets are IGNORE_INDEX; causal attention keeps the padding from the scored positions). A longer
    sequence is cut into pieces that score each of its tokens once; a piece's inputs start with the token before."""

    def __init__(self, sequences: list[list[int]], block_size: int, pad: int):
        self.block_size, self.pad = block_size, pad
        self.pieces = [ids[start : start + block_size + 1] for ids in sequences
                       for start in range(0, len(ids) - 1, block_size)]

    def __len__(self) -> int:
        return len(self.pieces)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        piece = torch.tensor(self.pieces[i], dtype=torch.int64)
        inputs = torch.full((self.block_size,), self.pad, dtype=torch.int64)
        targets = torch.full((self.block_size,), IGNORE_INDEX, dtype=torch.int64)
        inputs[: len(piece) - 1], targets[: len(piece) - 1] = piece[:-1], piece[1:]
        return inputs, targets
