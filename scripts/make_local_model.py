"""Build a small Hugging Face causal language model in a local folder, with nothing downloaded: a GPT-2 config of a
few layers (random weights) and a byte-level BPE tokenizer trained on the shipped Tiny Shakespeare, both saved with
save_pretrained. It is what a user with a local checkpoint has; configs/shakespeare_hf.yaml fine-tunes it.

    python scripts/make_local_model.py models/shakespeare-gpt2
    python scripts/make_local_model.py models/tiny --layers 2 --width 64 --heads 2 --vocab 512
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import SHAKESPEARE  # noqa: E402

END = "<|endoftext|>"  # GPT-2's one special token: begins and ends each sample, and pads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="Where to save the model and its tokenizer.")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024, help="Tokens the tokenizer learns (with 256 bytes).")
    parser.add_argument("--context", type=int, default=256, help="Longest sequence the model takes.")
    parser.add_argument("--dropout", type=float, default=0.1, help="GPT-2's dropout (embeddings, attention, residual).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()

    # the tokenizer: byte-level BPE, as GPT-2's, learned from the text itself
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train([str(SHAKESPEARE)], trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=[END], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=END, eos_token=END, pad_token=END)

    # the model: GPT-2's architecture at a small size, GPT-2's own initialization
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.context, n_embd=args.width, n_layer=args.layers,
                        n_head=args.heads, resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(args.folder)  # config.json and model.safetensors
    tokenizer.save_pretrained(args.folder)
    params = sum(p.numel() for p in model.parameters())
    print(f"saved a {args.layers}-layer GPT-2 ({params:,} parameters) and a {len(tokenizer)}-token tokenizer to "
          f"{args.folder}")


if __name__ == "__main__":
    main()
