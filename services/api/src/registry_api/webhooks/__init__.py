"""Webhook subscriptions: users choose which events reach which URL; the notifier delivers them."""
