"""What runs a job: the TrainContext handed to the user's ``train(ctx)`` (public), the worker
entry that builds it, the progress board, and the launcher that turns a JobSpec into a Ray
Train run. ``shipyard run`` and (later) submitted jobs use the same launcher."""


def __getattr__(name: str):
    # Lazy, so that the CLI and driver-side modules do not pay for importing torch.
    if name == "TrainContext":
        from shipyard.runtime.context import TrainContext

        return TrainContext
    raise AttributeError(name)


__all__ = ["TrainContext"]
