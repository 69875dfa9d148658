"""Training stages: SFT (theta_base), reference log-probs (once), DPO per direction."""
