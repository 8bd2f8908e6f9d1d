"""Tenants, API keys, the price book and the exactly-once usage ledger (see the billing issue)."""
