// The end-to-end substitution case with the kv backend and zstd chunks.
import { substitutionSuite } from "./substitution_suite.ts";

substitutionSuite("kv", "zstd", { bigMiB: 100 });
