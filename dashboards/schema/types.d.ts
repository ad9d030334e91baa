// The type a dashboard JSON file is checked against (by check.mjs).
import type { AnnotationQuery, Dashboard, DataQuery, VariableModel } from '@grafana/schema';

/**
 * T as a JSON document spells it. TypeScript refuses the string "absolute" where Grafana declares
 * the string enum ThresholdsMode, though that string is exactly what Grafana stores and reads, so a
 * string enum becomes the union of its values ("absolute" | "percentage"); a wrong value is still an
 * error. Keys, optionality, index signatures, arrays and numeric enums stay as Grafana declares them,
 * so unknown keys (excess properties of the literal) and wrong types are still caught.
 */
export type Json<T> = 0 extends 1 & T
  ? T // any stays any (the schema's escape hatches: panel options, query fields)
  : T extends string
    ? `${T}`
    : T extends readonly (infer E)[]
      ? Json<E>[]
      : T extends object
        ? { [K in keyof T]: Json<T[K]> }
        : T;

/**
 * The interval-variable keys that grafana-foundation-sdk (its VariableModel is generated from
 * Grafana's dashboard schema) writes on every variable, and that Grafana's interval variables read,
 * but that @grafana/schema's TypeScript VariableModel leaves out (13.2.3 and 11.6.16 alike). Without
 * them no SDK-built dashboard with a variable would pass. Only these three are added, with the SDK's
 * types.
 */
interface SdkVariableKeys {
  auto?: boolean;
  auto_min?: string;
  auto_count?: number;
}

/**
 * A Prometheus annotation query as Grafana 11's Prometheus data source saves and reads it: the
 * PromQL in `target` (as in a panel target) and, at the top level, how its hits become events.
 * @grafana/schema's AnnotationQuery types `target` as the bare DataQuery (refId, hide, ...) and
 * declares none of the top-level keys (13.2.3 and 11.6.16 alike; its own comment says "this should
 * just be a normal query target"), so no Prometheus annotation could pass without these. Panel
 * targets are loose in the schema itself (Record<string, unknown>); here only the keys of Grafana's
 * PromQuery and annotation editor are added, with their types, so a misspelt one is still an error.
 */
interface PrometheusAnnotationKeys {
  target?: DataQuery & { expr?: string; interval?: string; legendFormat?: string };
  step?: string;
  titleFormat?: string;
  textFormat?: string;
  tagKeys?: string;
  useValueForTime?: boolean;
}

/** Grafana's classic dashboard JSON model (the one with schemaVersion, panels and templating). */
export type DashboardJson = Json<
  Omit<Dashboard, 'templating' | 'annotations'> & {
    templating?: { list?: Array<VariableModel & SdkVariableKeys> };
    annotations?: { list?: Array<Omit<AnnotationQuery, 'target'> & PrometheusAnnotationKeys> };
  }
>;
