"""Helpers the local stack scripts call: wait for Kafka, prepare the MinIO bucket and its notifications.

python -m registry_shared.devstack wait-kafka     exit 0 once a metadata request succeeds
python -m registry_shared.devstack setup-minio    bucket + s3:ObjectCreated/Removed → Kafka, and one MinIO
                                                  user per service (API_MINIO_*, INGEST_MINIO_*) with a
                                                  policy limited to what the service does
"""

from __future__ import annotations

import asyncio
import sys

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from minio import MinioAdmin
from minio.credentials import StaticProvider
from minio.error import MinioAdminException
from minio.notificationconfig import NotificationConfig, QueueConfig

from registry_shared.events import Topics
from registry_shared.settings import KafkaSettings, MinioSettings
from registry_shared.storage import HF_LFS_PREFIX, QUARANTINE_PREFIX, UPLOAD_PREFIX, minio_client

#: Topics the services use, created up front with enough partitions for two consumers.
TOPIC_PARTITIONS = {
    Topics.USERS: 3,
    Topics.CATALOG: 3,
    Topics.UPLOADS: 3,
    Topics.VERDICTS: 3,
    Topics.ACCESS: 3,
    Topics.AUDIT: 3,
    Topics.DEAD_LETTER: 1,
    Topics.MINIO_EVENTS: 3,
}


async def wait_kafka(settings: KafkaSettings | None = None) -> None:
    """Succeed once the broker answers a metadata request; create the registry's topics."""
    s = settings or KafkaSettings()
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap_servers, request_timeout_ms=3000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, num_partitions=n, replication_factor=1)
            for name, n in TOPIC_PARTITIONS.items()
            if name not in existing
        ]
        if missing:
            await admin.create_topics(missing)
    finally:
        await admin.close()


def service_policies(bucket: str) -> dict[str, dict]:
    """The IAM policy of each service's MinIO user: only the bucket, only what the service does.

    from registry_shared.storage import HF_LFS_PREFIX, QUARANTINE_PREFIX, UPLOAD_PREFIX, minio_client
        - ingest: reads any object of the bucket, copies rejected and stray objects into quarantine/ (its only
          writes) and removes the original, aborts abandoned multipart uploads; it can never delete from
          quarantine/ (an explicit Deny).
    """
    b = f"arn:aws:s3:::{bucket}"
    version = "2012-10-17"
    return {
        "api": {
            "Version": version,
            "Statement": [
                # Served objects: uploads/, hf/ and whatever key an imported catalog names (the operator's
                # mirror paths), so any object of the bucket but quarantine/.
                {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [f"{b}/*"]},
                {"Effect": "Deny", "Action": ["s3:GetObject"], "Resource": [f"{b}/{QUARANTINE_PREFIX}*"]},
                {
                    "Effect": "Allow",
                    "Action": ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
                    "Resource": [f"{b}/{UPLOAD_PREFIX}*"],
                },
                {
                    # the /hf upload: LFS objects staged under hf-lfs/ (presigned and multipart PUTs, a HEAD
                    # for their size, the copy source of a commit), removed once the commit is decided
                    "Effect": "Allow",
                    "Action": [
                        "s3:GetObject",
                        "s3:PutObject",
                        "s3:DeleteObject",
                        "s3:AbortMultipartUpload",
                        "s3:ListMultipartUploadParts",
                    ],
                    "Resource": [f"{b}/{HF_LFS_PREFIX}*"],
                },
                {
                    "Effect": "Allow",
                    "Action": ["s3:ListBucket", "s3:ListBucketMultipartUploads", "s3:GetBucketLocation"],
                    "Resource": [b],
                },
            ],
        },
        "ingest": {
            "Version": version,
            "Statement": [
                {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [f"{b}/*"]},
                {"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": [f"{b}/{QUARANTINE_PREFIX}*"]},
                {"Effect": "Allow", "Action": ["s3:DeleteObject", "s3:AbortMultipartUpload"], "Resource": [f"{b}/*"]},
                {"Effect": "Deny", "Action": ["s3:DeleteObject"], "Resource": [f"{b}/{QUARANTINE_PREFIX}*"]},
                {
                    "Effect": "Allow",
                    "Action": ["s3:ListBucket", "s3:ListBucketMultipartUploads", "s3:GetBucketLocation"],
                    "Resource": [b],
                },
            ],
        },
    }


def minio_admin(settings: MinioSettings) -> MinioAdmin:
    """MinIO's admin API with the root credentials (only setup-minio holds them)."""
    creds = StaticProvider(settings.minio_root_user, settings.minio_root_password.get_secret_value())
    return MinioAdmin(endpoint=settings.minio_endpoint, credentials=creds, secure=settings.minio_secure)


def setup_service_users(settings: MinioSettings) -> list[str]:
    """One MinIO user per service whose `<SERVICE>_MINIO_ACCESS_KEY`/`_SECRET_KEY` are set, with its policy
    (`registry-<service>`) attached; idempotent. Returns the services set up."""
    admin = minio_admin(settings)
    done = []
    for service, policy in service_policies(settings.minio_bucket).items():
        own = settings.for_service(service)
        if own.minio_access_key is None or own.minio_secret_key is None:
            continue
        name = f"registry-{service}"
        admin.policy_add(name, policy=policy)
        admin.user_add(own.minio_access_key, own.minio_secret_key.get_secret_value())
        try:
            admin.attach_policy([name], user=own.minio_access_key)
        except MinioAdminException as exc:  # already attached
            if "already" not in str(exc).lower():
                raise
        done.append(service)
    return done


def setup_minio(settings: MinioSettings | None = None) -> None:
    """Create the bucket, send every created or removed object to Kafka (MinIO target REGISTRY), and create
    each service's restricted user."""
    s = settings or MinioSettings()
    root = s.model_copy(update={"minio_access_key": None, "minio_secret_key": None})
    client = minio_client(root)
    if not client.bucket_exists(s.minio_bucket):
        client.make_bucket(s.minio_bucket)
    config = NotificationConfig(
        queue_config_list=[
            QueueConfig(
                queue=s.minio_notify_arn,
                events=["s3:ObjectCreated:*", "s3:ObjectRemoved:*"],
                config_id="registry",
            ),
        ]
    )
    client.set_bucket_notification(s.minio_bucket, config)
    setup_service_users(root)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `registry-devstack`."""
    args = argv if argv is not None else sys.argv[1:]
    cmd = args[0] if args else ""
    try:
        if cmd == "wait-kafka":
            asyncio.run(wait_kafka())
        elif cmd == "setup-minio":
            setup_minio()
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except Exception as exc:  # a probe: the caller retries
        print(f"{cmd}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
