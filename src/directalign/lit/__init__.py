"""LightningModules of the three training stages (SFT, reward model, alignment)."""
