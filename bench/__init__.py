"""Benchmark harness for fused_bn: parity check, then fused_bn vs nn.BatchNorm2d
(eager) vs torch.compile(nn.BatchNorm2d), timed back to back for every case.

Entry point: ``python3 -m bench.run`` (see ``--help``); method in bench/NOTES.md.
"""
