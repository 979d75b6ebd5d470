"""The REST API (FastAPI, versioned under ``/v1``): ``create_app`` builds it over a store, a
backend and the scheduler loop; ``shipyard server`` (:mod:`shipyard.api.serve`) runs it."""

from shipyard.api.app import ApiConfig, create_app

__all__ = ["ApiConfig", "create_app"]
