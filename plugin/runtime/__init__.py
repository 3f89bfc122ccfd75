"""exl3_triton.runtime: paged cache, continuous-batching generator, sampling, streaming."""

from .async_generator import AsyncGenerator
from .cache import PagedCache, SequenceCache
from .generator import Generator
from .job import Job, JobEvent, JobStats, JobStatus
from .sampling import SamplingParams

__all__ = ["AsyncGenerator", "Generator", "Job", "JobEvent", "JobStats", "JobStatus", "PagedCache",
           "SamplingParams", "SequenceCache"]
