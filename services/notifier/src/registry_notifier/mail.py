"""E-mail: what is sent for which event, and sending it over SMTP (smtplib in a worker thread)."""

from __future__ import annotations

import smtplib
import ssl
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import make_msgid

from registry_notifier.settings import NotifierSettings


def _when(ts: int | None) -> str:
    if ts is None:
        return "without end"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def upload_rejected(data: dict) -> tuple[str, str]:
    """(subject, body) telling a developer why their upload was refused."""
    where = f"{data['repo_id']} {data['version']}/{data['rfilename']}"
    body = (
        f"Your upload of {where} (upload {data['upload_id']}) was rejected.\n\n"
        f"Reason: {data['reason']}\n"
        + (f"Detail: {data['detail']}\n" if data.get("detail") else "")
        + "\nThe file is not served. Upload it again with the right size and sha256.\n"
    )
    return f"Upload rejected: {where} ({data['reason']})", body


def grant_created(data: dict) -> tuple[str, str]:
    """(subject, body) telling a platform user they were granted a model."""
    body = (
        f"You were granted the model {data['repo_id']} (grant {data['grant_id']}).\n\n"
        f"Visible from: {_when(data['permitted_from_ts'])}\n"
        f"Visible until: {_when(data.get('permitted_until_ts'))}\n"
    )
    return f"Model granted: {data['repo_id']}", body


def grant_revoked(data: dict) -> tuple[str, str]:
    """(subject, body) telling a platform user a grant was revoked."""
    body = (
        f"Your grant {data['grant_id']} to the model {data['repo_id']} was revoked.\nYou no longer have access to it.\n"
    )
    return f"Grant revoked: {data['repo_id']}", body


def key_rotated(data: dict) -> tuple[str, str]:
    """(subject, body) telling an account owner their API key changed."""
    body = (
        f"The API key of your account was rotated at {_when(data['rotated_ts'])}.\n"
        f"The new key starts with sk_live_{data['key_prefix']}; the previous key no longer works.\n\n"
        "If you did not do this, rotate your key again and contact an administrator.\n"
    )
    return "Your API key was rotated", body


def webhook_disabled(webhook_id: int, url: str, reason: str | None) -> tuple[str, str]:
    """(subject, body) telling a webhook's owner it was disabled."""
    body = (
        f"Your webhook {webhook_id} ({url}) was disabled: {reason or 'too many failed deliveries'}.\n\n"
        "Pending deliveries are kept. Fix the receiver, then re-enable the webhook with\n"
        f'PATCH /v1/webhooks/{webhook_id} {{"enabled": true}}; delivery resumes where it stopped.\n'
    )
    return f"Webhook {webhook_id} disabled", body


#: RFC 5322 allows 998 characters a line: subjects naming long repo ids stay on one line.
_POLICY = policy.SMTP.clone(max_line_length=998)


class SmtpMailer:
    """Sends one message per connection to the configured relay (blocking: call it in a thread)."""

    def __init__(self, settings: NotifierSettings) -> None:
        self._s = settings

    def send(self, to_addr: str, subject: str, body: str) -> None:
        """Send a plain-text e-mail; raises smtplib/OSError on failure."""
        s = self._s
        msg = EmailMessage(policy=_POLICY)
        msg["From"] = s.smtp_from
        msg["To"] = to_addr
        msg["Subject"] = subject
        msg["Message-ID"] = make_msgid(domain="registry.local")
        msg.set_content(body)
        context = ssl.create_default_context()
        if s.smtp_ssl:
            client: smtplib.SMTP = smtplib.SMTP_SSL(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_s, context=context)
        else:
            client = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_s)
        with client:
            if s.smtp_starttls and not s.smtp_ssl:
                client.starttls(context=context)
            if s.smtp_username:
                client.login(s.smtp_username, s.smtp_password.get_secret_value())
            client.send_message(msg)
