"""Admission: authenticates tenants, validates requests, enforces quotas and sheds load."""
