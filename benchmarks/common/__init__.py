"""What every study shares: provenance of its numbers and where results live."""

from benchmarks.common.provenance import CODE_PATHS, RESULTS, ROOT, git_commit, provenance

__all__ = ["CODE_PATHS", "RESULTS", "ROOT", "git_commit", "provenance"]
