"""Helpers the local stack scripts call: wait for Kafka, prepare the bucket (and its notifications).

python -m registry_shared.devstack wait-kafka      exit 0 once a metadata request succeeds
python -m registry_shared.devstack setup-storage   bucket (+ s3:ObjectCreated/Removed → Kafka when the mode in
                                                    force is `kafka`), on the server STORAGE_BACKEND names
python -m registry_shared.devstack setup-minio     the same (its former name)
"""

from __future__ import annotations

import asyncio
import sys

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from registry_shared.events import Topics
from registry_shared.settings import KafkaSettings, MinioSettings
from registry_shared.storage_backend import backend_for

#: Topics the services use, created up front with enough partitions for two consumers.
TOPIC_PARTITIONS = {
    Topics.USERS: 3,
    Topics.CATALOG: 3,
    Topics.UPLOADS: 3,
    Topics.VERDICTS: 3,
    Topics.ACCESS: 3,
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


def setup_storage(settings: MinioSettings | None = None) -> str:
    """Create the bucket and, in mode `kafka`, send every created or removed object to Kafka; the mode."""
    return backend_for(settings or MinioSettings()).setup()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `registry-devstack`."""
    args = argv if argv is not None else sys.argv[1:]
    cmd = args[0] if args else ""
    try:
        if cmd == "wait-kafka":
            asyncio.run(wait_kafka())
        elif cmd in ("setup-storage", "setup-minio"):
            setup_storage()
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except Exception as exc:  # a probe: the caller retries
        print(f"{cmd}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
