"""Audit: LRP relevance for a labelled dataset, SpRAy per class, a ranked report of Clever-Hans suspects."""
