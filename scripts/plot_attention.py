"""Draw the attention maps of an hf_attn checkpoint for one text: a layers x heads grid PNG with token
labels, and an interactive bertviz HTML when bertviz is installed.

    python scripts/plot_attention.py outputs/small_eager/final --text "def add(a, b):\n    return a + b" --out maps
    python scripts/plot_attention.py CKPT --text "..." --layers 0,2 --heads 1 --name attention_eager --out docs/images

Every mode is drawn as (query x key) weights: full and rotary attention as returned by
``output_attentions``, local attention's blocked weights put back at their positions, causal low-rank
as the attention its feature map implies (checked against the layer output); bidirectional low-rank as
its (token x slot) map. Dense maps cost O(L^2) memory per layer and head: keep texts short. See
docs/analysis.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import hf_attn  # noqa: F401  (registers the Auto classes)
from hf_attn.analysis.attention_maps import (
    attention_maps,
    plot_attention_grid,
    token_labels,
    write_bertviz_html,
)


def _indices(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 0,2") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="saved folder (save_pretrained) with its tokenizer")
    parser.add_argument("--text", required=True, help=r"text to run (\n and \t are read as newline and tab)")
    parser.add_argument("--layers", type=_indices, help="comma-separated layer indices (default: all)")
    parser.add_argument("--heads", type=_indices, help="comma-separated head indices (default: all)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--name", default="attention", help="file name stem: NAME.png and NAME.html")
    parser.add_argument("--title", help="figure title (default: the checkpoint path and mode)")
    parser.add_argument("--no-html", action="store_true", help="skip the bertviz HTML even if bertviz is installed")
    args = parser.parse_args(argv)

    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    text = args.text.replace("\\n", "\n").replace("\\t", "\t")
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    try:
        maps = attention_maps(model, input_ids)
        tokens = token_labels(tokenizer, input_ids[0].tolist())
        config = model.config
        title = args.title or (f"{args.checkpoint}: attention_mode={config.attention_mode}, "
                               f"positions={config.position_embedding_type}, {input_ids.shape[1]} tokens")
        png = plot_attention_grid(maps, tokens, Path(args.out) / f"{args.name}.png", layers=args.layers,
                                  heads=args.heads, title=title)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {png}")
    if maps.max_error:
        print(f"implied low-rank attention reproduces each layer's output to {max(maps.max_error):.2e} (max abs error)")
    if not args.no_html:
        html = write_bertviz_html(maps, tokens, Path(args.out) / f"{args.name}.html", layers=args.layers)
        print(f"wrote {html}" if html else "no HTML: bertviz is not installed" if maps.kind == "dense"
              else "no HTML: bertviz draws token-to-token maps only, not Linformer slot maps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
