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
from fedmtl.data.multilabel import CocoCaptionsSource, CocoMultilabelSource, VocMultilabelSource
from fedmtl.data.partition import cap_positions, client_split, partition_indices
from fedmtl.data.public import PublicDataset
from fedmtl.data.quickstart import QuickstartSource, QuickstartTextSource
from fedmtl.data.text import TextClassificationSource

__all__ = [
    "DATASET_REGISTRY",
    "Cifar10Source",
    "Cifar100Source",
    "CocoCaptionsSource",
    "CocoMultilabelSource",
    "DatasetSource",
    "NyudSource",
    "PascalContextSource",
    "PublicDataset",
    "QuickstartSource",
    "QuickstartTextSource",
    "SampleSet",
    "TaskInfo",
    "TextClassificationSource",
    "VocMultilabelSource",
    "cap_positions",
    "client_split",
    "collate",
    "create_dataset",
    "dataset_task_table",
    "partition_indices",
    "register_dataset",
]
