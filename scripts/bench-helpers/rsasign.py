"""RSA PKCS#1 v1.5 signatures with SHA-1, as shadir entries are signed, in plain Python.

The benchmark signs its 1,000 entries here instead of spawning `openssl` per entry.
Only PKCS#1 PEM private keys ("BEGIN RSA PRIVATE KEY") are read.
"""

import base64
import hashlib

# DER of DigestInfo { sha1, NULL } up to the 20-byte digest (RFC 8017, 9.2 note 1).
SHA1_PREFIX = bytes.fromhex("3021300906052b0e03021a05000414")


def _der_length(der, i):
    first = der[i]
    if first < 0x80:
        return first, i + 1
    n = first & 0x7F
    return int.from_bytes(der[i + 1:i + 1 + n], "big"), i + 1 + n


def _der_integers(der):
    """The INTEGERs of a DER SEQUENCE of INTEGERs."""
    if der[0] != 0x30:
        raise ValueError("not a DER SEQUENCE")
    length, i = _der_length(der, 1)
    end = i + length
    out = []
    while i < end:
        if der[i] != 0x02:
            raise ValueError("not an INTEGER")
        length, i = _der_length(der, i + 1)
        out.append(int.from_bytes(der[i:i + length], "big"))
        i += length
    return out


class Signer:
    def __init__(self, pem):
        begin, end = "-----BEGIN RSA PRIVATE KEY-----", "-----END RSA PRIVATE KEY-----"
        if begin not in pem:
            raise ValueError("not a PKCS#1 RSA private key")
        body = pem.split(begin, 1)[1].split(end, 1)[0]
        ints = _der_integers(base64.b64decode("".join(body.split())))
        _version, self.n, _e, _d, self.p, self.q, self.dp, self.dq, self.qinv = ints[:9]
        self.k = (self.n.bit_length() + 7) // 8

    def sign(self, data):
        t = SHA1_PREFIX + hashlib.sha1(data).digest()
        em = b"\x00\x01" + b"\xff" * (self.k - 3 - len(t)) + b"\x00" + t
        m = int.from_bytes(em, "big")
        # CRT: two half-size exponentiations.
        s1, s2 = pow(m, self.dp, self.p), pow(m, self.dq, self.q)
        s = s2 + ((self.qinv * (s1 - s2)) % self.p) * self.q
        return s.to_bytes(self.k, "big")

    def sign_b64(self, data):
        return base64.b64encode(self.sign(data)).decode()
