"""Tracing: copy the model without its tensors, trace it into one flat graph per mode, record its module calls.

Example:
    >>> from fxblur.trace import trace
    >>> traced = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2)))
    >>> traced.graph.find_nodes(op="call_module")[0].target
    '0'
"""

from fxblur.trace.errors import UntraceableModelError
from fxblur.trace.tracer import BlurTracer, Traced, trace

__all__ = ["BlurTracer", "Traced", "UntraceableModelError", "trace"]
