"""Key manager: site and tenant identities, data-encryption keys, rotation and revocation."""
