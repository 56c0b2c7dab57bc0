// The end-to-end substitution case with the filesystem backend and zstd chunks.
import { substitutionSuite } from "./substitution_suite.ts";

substitutionSuite("filesystem", "zstd", { bigMiB: 100 });
