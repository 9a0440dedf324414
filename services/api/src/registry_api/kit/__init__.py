"""Small cross-cutting helpers of the api."""
