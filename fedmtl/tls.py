"""File names of the TLS material ``fedmtl deploy certs`` writes into a certificates folder.

Shared by the writer (:mod:`fedmtl.deploy.credentials`) and the readers (the SuperLink's
command line, FedMuscle's stream server), which must agree on them.
"""

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
