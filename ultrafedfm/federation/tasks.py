"""The names of the tasks a round sends to the sites: the vocabulary server and sites share.

A plain round is one ``train`` task; a secure-aggregation round wraps it in the key-exchange,
consistency-check and unmask tasks of ``ultrafedfm.secagg`` (Bonawitz et al. 2017).
"""
from __future__ import annotations

__all__ = [
    "ADVERTISE_TASK", "ALL_TASKS", "CONSISTENCY_TASK", "SECAGG_TASKS", "SHARE_KEYS_TASK", "TRAIN_TASK", "UNMASK_TASK",
]

TRAIN_TASK = "train"
ADVERTISE_TASK = "secagg_advertise_keys"
SHARE_KEYS_TASK = "secagg_share_keys"
CONSISTENCY_TASK = "secagg_consistency_check"
UNMASK_TASK = "secagg_unmask"
SECAGG_TASKS = (ADVERTISE_TASK, SHARE_KEYS_TASK, CONSISTENCY_TASK, UNMASK_TASK)
ALL_TASKS = (TRAIN_TASK, *SECAGG_TASKS)
