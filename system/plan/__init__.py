"""Plans of paper-size jobs without a GPU or any weights (`--dry-run`): one training step of a
method traced with fake tensors (trace.py, batches.py), its bytes per rank under ZeRO (memory.py),
FLOPs, time and GPU-hours on a named card (cards.py, train.py), and the sampling / VAπ rollout
decode plan (decode.py). Weight loaders honour system/models/weights.py's plan mode."""
from system.plan.cards import CARDS, Card, Fit, card
from system.plan.memory import Memory, ZeroSetting, checkpoint_bytes, model_state_bytes, rank_memory
from system.plan.train import Suggestion, TrainPlan, plan_training

__all__ = ["CARDS", "Card", "Fit", "card", "Memory", "ZeroSetting", "checkpoint_bytes", "model_state_bytes", "rank_memory",
           "Suggestion", "TrainPlan", "plan_training"]
