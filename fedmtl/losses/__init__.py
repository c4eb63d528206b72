"""Losses: task-agnostic regularisers and contrastive objectives (Muscle, InfoNCE, GRAM)."""
