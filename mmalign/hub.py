"""Hub ids (`owner/name`): find out at once whether a model or dataset named by one can be had, before loading it.

How huggingface_hub decides: with HF_HUB_OFFLINE=1 (read once at import into `huggingface_hub.constants`) every
request fails at once and only the local cache is used. Online, a download first sends one HEAD request without
retries and, when it fails, falls back to a cached copy; with no cached copy it retries with exponential backoff
(1, 2, 4, 8, 8 s, each try waiting up to HF_HUB_ETAG_TIMEOUT, 10 s), so a machine that cannot reach the hub waits
25 s to over a minute for an error that says the repository "does not appear to have" the file.

`unreachable` answers first, in one step: a repository with one of the given files in the cache
(`try_to_load_from_cache`) is left to the libraries, which use the cache when the hub does not answer; offline,
a repository not in the cache cannot be had; online, one request for the repository's info (no retries, timeout
HF_HUB_ETAG_TIMEOUT) tells whether the hub answers and knows it. A user who is online pays that one request.
"""

from __future__ import annotations


def is_repo_id(text: str) -> bool:
    """Whether `text` has the form of a namespaced hub repository id, `owner/name` (huggingface_hub's own rules)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.count("/") != 1 or text.startswith((".", "/")):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def unreachable(repo_id: str, repo_type: str = "model", cached: tuple[str, ...] = ()) -> str | None:
    """Why the hub repository `repo_id` cannot be had now, in a few words; None when it can (one of the `cached`
    files is in the local cache, or the hub answered for it). See the module docstring."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if any(isinstance(huggingface_hub.try_to_load_from_cache(repo_id, name, repo_type=repo_type), str)
           for name in cached):
        return None
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and the local hub cache holds no copy of it"
    try:
        huggingface_hub.HfApi().repo_info(repo_id, repo_type=repo_type, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except RepositoryNotFoundError:
        return "the hub has no such repository (or it is private: log in with `hf auth login`)"
    except HfHubHTTPError as err:
        return f"the hub answered {' '.join(str(err).split())[:300]}"
    except Exception as err:  # noqa: BLE001 - network failures arrive as the HTTP client's own types
        return (f"the hub cannot be reached ({type(err).__name__}: {err}); to use copies in the local cache, "
                "set HF_HUB_OFFLINE=1")
    return None
