"""The stages: each a function ``run(config, inputs, out_dir, **sections) -> facts`` from its
recipe section and its input cache entries to its own entry. No stage imports another;
what two stages share lives below them (io/, quant/, eval/, search/). The order and the
recipe sections are pipeline/app/plan.py's."""
