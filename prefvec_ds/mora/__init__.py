"""MORA data synthesis (arXiv 2605.11679): mine single-reward prompts at Pass@N, rewrite them
with several intents, self-play with feedback on every reward dimension, keep max-margin pairs.

mining -> rewrite -> selfplay + scoring -> select -> stage (shards) -> gather (pairs_io, report,
plots); `prefvec mora` in commands. The `pipeline.mora` section is prefvec_ds.config.mora (config
sits below every stage); the pairs it writes are read back by prefvec_ds.data.sources (`source:
mora`). See docs/mora.md.
"""
