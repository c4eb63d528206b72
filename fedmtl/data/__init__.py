"""Datasets, client partitions and the public dataset; importing registers every source."""

from fedmtl.data.base import (
    DATASET_REGISTRY,
    DatasetSource,
    SampleSet,
    TaskInfo,
    collate,
    create_dataset,
    dataset_task_table,
    register_dataset,
)
from fedmtl.data.cifar import Cifar10Source, Cifar100Source
from fedmtl.data.dense import NyudSource, PascalContextSource
from fedmtl.data.multilabel import CocoMultilabelSource, VocMultilabelSource
from fedmtl.data.partition import cap_positions, client_split, partition_indices
from fedmtl.data.public import PublicDataset
from fedmtl.data.quickstart import QuickstartSource, QuickstartTextSource

__all__ = [
    "DATASET_REGISTRY",
    "Cifar10Source",
    "Cifar100Source",
    "CocoMultilabelSource",
    "DatasetSource",
    "NyudSource",
    "PascalContextSource",
    "PublicDataset",
    "QuickstartSource",
    "QuickstartTextSource",
    "SampleSet",
    "TaskInfo",
    "VocMultilabelSource",
    "cap_positions",
    "client_split",
    "collate",
    "create_dataset",
    "dataset_task_table",
    "partition_indices",
    "register_dataset",
]
