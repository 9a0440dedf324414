-- Multipart uploads (issue 12): an upload row may stand for an S3 multipart upload whose parts the
-- developer PUTs through presigned part URLs. Such a row knows its S3 upload id, the file's size
-- declared at initiate, and how it is cut into parts. A developer may abort an upload: 'aborted'.
alter table uploads add column multipart_upload_id text;
alter table uploads add column multipart_size bigint check (multipart_size > 0);
alter table uploads add column part_size bigint check (part_size > 0);
alter table uploads add column part_count integer check (part_count between 1 and 10000);
alter table uploads add constraint uploads_multipart_complete check (
    (multipart_upload_id is null and multipart_size is null and part_size is null and part_count is null)
    or (multipart_upload_id is not null and multipart_size is not null and part_size is not null
        and part_count is not null)
);
alter table uploads drop constraint uploads_status_check;
alter table uploads add constraint uploads_status_check
    check (status in ('initiated', 'pending_verification', 'available', 'rejected', 'expired', 'aborted'));
