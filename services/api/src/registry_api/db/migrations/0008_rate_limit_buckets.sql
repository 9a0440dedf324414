-- Rate limits (issue 15): one token bucket per user / per client IP, shared by every api process.
-- UNLOGGED: written on most leases, worthless after a crash (a crash refills every bucket, which is safe).
create unlogged table rate_limit_buckets (
    bucket   text primary key,
    tokens   double precision not null,
    updated  double precision not null,  -- Postgres's clock (epoch s) at the last lease
    granted  double precision not null   -- what the last lease took
);
