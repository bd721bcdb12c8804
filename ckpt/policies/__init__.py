"""Save-decision and preservation policies: small objects with one method each."""
from ckpt.policies import preservation, save_decision

__all__ = ["preservation", "save_decision"]
