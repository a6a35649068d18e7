"""Sample text from a saved hf_attn model (any ``save_pretrained`` folder or Hub id).

python scripts/generate.py outputs/small_eager/final --prompt "def " --max_new_tokens 120
"""

from __future__ import annotations

import argparse
import sys

from hf_attn.training.generation import generate_text, load_model_and_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "model", help="folder written by save_pretrained (e.g. outputs/small_eager/final) or Hub id"
    )
    parser.add_argument("--prompt", default="def ", help="text to continue (empty: start a new document)")
    parser.add_argument("--max_new_tokens", type=int, default=120)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy decoding")
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--trust_remote_code", action="store_true", help="use the code saved with the model")
    args = parser.parse_args(argv)
    try:
        model, tokenizer = load_model_and_tokenizer(
            args.model, device=args.device, trust_remote_code=args.trust_remote_code
        )
        for i in range(args.num_samples):
            text = generate_text(
                model,
                tokenizer,
                args.prompt,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                seed=args.seed + i,
            )
            print(f"----- sample {i + 1} -----\n{text}")
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
