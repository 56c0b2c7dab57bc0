/**
 * Topic keys: the secret a swarm segment's members share. A topic is given either as the
 * 64 hex digits `arca keygen` prints (used as the 32 key bytes) or as any other string
 * (`--topic`, an ad-hoc segment: its UTF-8 bytes). Everything the swarm needs is derived
 * from it with HKDF-SHA256 under distinct labels, so no derived value reveals another:
 *
 * - `psk`: the Noise XXpsk3 pre-shared key (only topic holders complete a handshake);
 * - `beaconKey`: the key of the discovery beacons' MAC (rotating per time window);
 * - `syncHintKey`: the key of the hint a connecting peer sends before its Noise handshake,
 *   so a node with several topics on one sync port knows which PSK to use (the hint is an
 *   HMAC of a fresh random nonce: it links nothing across connections);
 * - `segmentTag`: a local, never-transmitted label for logs and storage keys.
 * @module
 */

import { hkdfSync } from "node:crypto";
import { FormatError } from "../errors.ts";

/** Keys derived from one topic. */
export interface TopicKeys {
  psk: Uint8Array;
  beaconKey: Uint8Array;
  syncHintKey: Uint8Array;
  segmentTag: Uint8Array;
}

const SALT = new TextEncoder().encode("pares-arca topic v1");

/** The secret bytes of a topic string: 64 hex digits → 32 bytes, else UTF-8. */
export function topicSecret(topic: string): Uint8Array {
  if (topic.length === 0) throw new FormatError("Topic key must not be empty");
  if (/^[0-9a-fA-F]{64}$/.test(topic)) {
    const out = new Uint8Array(32);
    for (let i = 0; i < 32; i++) out[i] = parseInt(topic.slice(2 * i, 2 * i + 2), 16);
    return out;
  }
  return new TextEncoder().encode(topic);
}

function derive(secret: Uint8Array, label: string): Uint8Array {
  return new Uint8Array(hkdfSync("sha256", secret, SALT, new TextEncoder().encode(label), 32));
}

/** Derives the swarm keys of a topic. */
export function deriveTopicKeys(topic: string): TopicKeys {
  const secret = topicSecret(topic);
  return {
    psk: derive(secret, "noise psk"),
    beaconKey: derive(secret, "discovery beacon mac"),
    syncHintKey: derive(secret, "sync connection hint"),
    segmentTag: derive(secret, "segment tag"),
  };
}
