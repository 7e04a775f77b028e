"""Encoding shard sets with a frozen model (pre-tokenization, the latent cache): above system/models
and system/data, whose shard formats it writes."""
