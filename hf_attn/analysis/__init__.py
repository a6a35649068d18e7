"""Analysis tools for trained hf_attn models: attention maps and perplexity versus context length.

Not imported by the modeling files (a checkpoint's remote code never needs it); import it explicitly::

    from hf_attn.analysis.attention_maps import attention_maps, plot_attention_grid
    from hf_attn.analysis.context_length import evaluate_lengths, write_csv, plot_perplexity

``scripts/plot_attention.py`` and ``scripts/eval_length.py`` are thin command lines over these;
docs/analysis.md describes the methods and the measured results.
"""
