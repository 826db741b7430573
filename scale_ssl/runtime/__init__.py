"""Where this process sits in the job, what its hardware runs fastest, and how a distributed run
fails: shared by the strategies, the loop and the CLI, so none of them imports another's backend
to name an error."""

from scale_ssl.runtime.cluster_environment import ClusterEnvironment
from scale_ssl.runtime.errors import CollectiveFailure, LaunchError, is_collective_failure

__all__ = ["ClusterEnvironment", "CollectiveFailure", "LaunchError", "is_collective_failure"]
