"""Block-autoregressive video generation with reward-routed speculative blocks (SDVG, issue 15)."""
