"""MuonClip and aux-loss-free load balancing."""

from openk2.optim.balance import load_imbalance, update_routing_bias_
from openk2.optim.muon import MuonClip, muon_update, newton_schulz, split_parameters
from openk2.optim.qk_clip import qk_clip_

__all__ = [
    "MuonClip",
    "load_imbalance",
    "muon_update",
    "newton_schulz",
    "qk_clip_",
    "split_parameters",
    "update_routing_bias_",
]
