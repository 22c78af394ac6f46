"""The jobs a command may show: a user's own; root's, every user's (or one user's)."""

from __future__ import annotations

from hpcckpt.context import User
from hpcckpt.observe.jobstats import JobStats, load_jobs
from hpcckpt.store.access import has_catalog, target_users
from hpcckpt.store.site import Site


def visible_jobs(site: Site, acting: User, *, user_name: str | None = None, job_id: str | None = None,
                 since: float | None = None) -> list[JobStats]:
    """Jobs with a row or event since ``since`` (None: all), read from each user's catalog as that user."""
    if site.shared_catalog and acting.is_root and user_name is None:
        with site.opened(acting) as (cat, _):
            return load_jobs(cat, job_id=job_id, since=since)
    jobs: list[JobStats] = []
    for user in target_users(site.store_root, acting, user_name):
        if not has_catalog(site, user):
            continue
        with site.opened(user) as (cat, _):
            jobs.extend(load_jobs(cat, uid=user.uid, job_id=job_id, since=since))
    return sorted(jobs, key=lambda j: (j.user, j.job_id))
