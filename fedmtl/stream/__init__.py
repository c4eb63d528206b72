"""FedMuscle's per-batch exchange over a direct gRPC stream (``channel = "stream"``).

The Flower message path costs seconds per request/response in deployment, too slow for one
synchronous exchange per public batch. The ServerApp opens a gRPC server for the contrastive
phase (:mod:`fedmtl.stream.server`), announces it in the ``train.align`` message that starts
the phase (address, per-run per-client token, CA), and each client keeps one bidirectional
stream for the phase (:mod:`fedmtl.stream.client`). Schema: ``fedmtl/proto/muscle_stream.proto``
(``make proto`` regenerates the Python modules).
"""
