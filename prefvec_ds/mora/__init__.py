"""MORA data synthesis (arXiv 2605.11679): mine single-reward prompts at Pass@N, rewrite them
with several intents, self-play with feedback on every reward dimension, keep max-margin pairs.

config -> mining -> rewrite -> selfplay + scoring -> select -> stage (shards) -> gather
(pairs_io, report, plots); `prefvec mora` in commands. See docs/mora.md.
"""
