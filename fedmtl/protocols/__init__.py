"""Each algorithm's wire format, in one module that both sides import.

:mod:`fedmtl.messages` is the format every algorithm uses (message types ``describe``,
``train``, ``evaluate``; the ``config``/``arrays``/``metrics`` records). A module here adds what
one algorithm puts on top: its extra message types, record keys and the schedule both sides
must agree on. The server side (``fedmtl.strategies``) and the client side
(``fedmtl.clients``) import these modules and never each other.
"""
