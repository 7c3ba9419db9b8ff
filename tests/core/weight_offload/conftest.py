from tests.models import one_thread

__all__ = ["one_thread"]  # autouse: one intra-op thread while each test runs
