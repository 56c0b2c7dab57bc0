/**
 * Parsers of the durations and sizes users give on the command line (`gc --max-age 30d`,
 * `--max-size 10G`, `audit --since 24h`).
 * @module
 */

import { UsageError } from "./errors.ts";

/** Parses `30d`, `24h`, `1h30m`, `45s`, `2w` into milliseconds. */
export function parseDuration(text: string): number {
  const units: Record<string, number> = {
    w: 604_800_000,
    d: 86_400_000,
    h: 3_600_000,
    m: 60_000,
    s: 1000,
  };
  if (!/^(\d+[wdhms])+$/.test(text)) {
    throw new UsageError(`Invalid duration '${text}': expected e.g. 30d, 24h, 1h30m`);
  }
  let total = 0;
  for (const [, count, unit] of text.matchAll(/(\d+)([wdhms])/g)) {
    total += Number(count) * units[unit];
  }
  return total;
}

/** Parses `500M`, `10G`, `1T`, `4096` (bytes; K/M/G/T are powers of 1024). */
export function parseSize(text: string): number {
  const match = /^(\d+(?:\.\d+)?)([KMGT]i?B?|B)?$/i.exec(text);
  if (!match) throw new UsageError(`Invalid size '${text}': expected e.g. 500M, 10G, 1T`);
  const exponent = match[2] ? "BKMGT".indexOf(match[2][0].toUpperCase()) : 0;
  return Math.floor(Number(match[1]) * 1024 ** exponent);
}
