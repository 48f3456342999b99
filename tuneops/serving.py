"""Where the registered pyfuncs lived before ``tuneops.inference.pyfunc``: a version registered then
pickled its model as ``tuneops.serving.OnnxChatModel`` / ``HeadModel``, and MLflow unpickles it by
that name (the registry's champion gate and a head model's serving load it in this process).
Nothing new imports this module."""
from tuneops.inference.pyfunc import HeadModel, OnnxChatModel  # noqa: F401
